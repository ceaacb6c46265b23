# farm's virtual environment first, also for login shells (/etc/profile resets PATH).
case ":$PATH:" in
  *:/opt/farm/bin:*) ;;
  *) export PATH="/opt/farm/bin:$PATH" ;;
esac
